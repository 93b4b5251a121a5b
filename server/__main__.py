"""`python -m genrec.server --bundle DIR ...`: the same as `genrec serve` (for images and scripts that call the module)."""

import typer

from genrec.server.cli import serve

if __name__ == "__main__":
    typer.run(serve)
