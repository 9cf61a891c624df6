"""tinker.lib: where Tinker keeps its public interfaces."""
