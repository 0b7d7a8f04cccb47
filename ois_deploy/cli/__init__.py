"""The `ois-deploy` command line: one module per command group, registered on one typer app.
Bad input ends in one line on stderr and exit code 2; so does a missing optional dependency,
with the extra that installs it."""

from __future__ import annotations

import shlex
import sys
from typing import Optional

import typer

from ..errors import UserError, exit_with
from .app import app
# Importing the command modules registers their commands, in this order in --help.
from . import model_cmds, export_cmds, evaluate_cmds, train_cmds, serve_cmd  # noqa: F401,E402,I001

# Optional top-level modules -> the extra that installs them.
EXTRAS = {
    "torch": "export", "onnx": "export", "onnxscript": "export", "onnxslim": "export", "polygraphy": "export",
    "onnxruntime": "cpu", "tensorrt": "gpu", "matplotlib": "plot",
    "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "prometheus_client": "serve", "ray": "ray",
}


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The one-line message for an optional dependency that is not installed, else None."""
    top = (error.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    extra = EXTRAS[top]
    hint = " (PyTorch: pip install torch, a CPU build where no GPU is used)" if top == "torch" else ""
    return f"this needs {top}, which is not installed: pip install 'ois-deploy[{extra}]'{hint}"


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        # the command line rides in the context's obj, for results that record how they were made
        code = app(args=args, standalone_mode=False, prog_name="ois-deploy", obj={"command": shlex.join(["ois-deploy", *args])})
    except UserError as e:
        exit_with(e)
    except ModuleNotFoundError as e:
        message = missing_extra(e)
        if message is None:
            raise
        exit_with(UserError(message))
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # Usage errors of typer's (vendored) click: one line, their exit code (2).
        if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
            print(f"error: {e.format_message()}", file=sys.stderr)
            sys.exit(e.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)
