"""Task vectors: expert - base, checked and streamed (source), or held in flat buffers (store)."""
