#!/usr/bin/env python
"""Export a BriLLM folder to the reference BriLLM0.5 layout: `modeling_brillm.export` (``--help``).

Needs the package installed (``pip install -e .``); ``python -m modeling_brillm.export`` is the same command.
"""

from modeling_brillm.export import main

if __name__ == "__main__":
    main()
