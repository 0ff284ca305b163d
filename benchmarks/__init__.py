"""Side-by-side measurements of lmrep against its references (see benchmarks/RESULTS.md)."""
