"""`python -m gpt2chat` (also what `torchrun -m gpt2chat` runs)."""

from gpt2chat.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
