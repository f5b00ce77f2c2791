"""One rank's share of the task vectors: resident, ZeRO-3 offloaded to CPU, or on NVMe."""
