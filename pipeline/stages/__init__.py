"""One module per DVC stage, each with a pure `run(...)` and a short `main()`."""
