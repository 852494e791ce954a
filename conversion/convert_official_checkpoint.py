#!/usr/bin/env python
"""Convert a reference BriLLM0.5 checkpoint to a Hugging Face folder: `modeling_brillm.conversion` (``--help``).

Needs the package installed (``pip install -e .``); ``python -m modeling_brillm.conversion`` is the same command.
"""

from modeling_brillm.conversion import main

if __name__ == "__main__":
    main()
