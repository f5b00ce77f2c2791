"""The learned merge's parts: coefficients, merged body, task models, data, objectives, trainer,
tree plan, node execution, report."""
