"""``codedistill`` and ``python -m codedistill``: a plain ``evaluate`` line runs without typer
(:mod:`codedistill.evaluate_command`), anything else goes to the typer app
(:mod:`codedistill.cli`)."""

import sys


def main() -> None:
    from codedistill.evaluate_command import plain_argv, run_plain

    params = plain_argv(sys.argv[1:])
    if params is not None:
        run_plain(params)
        return
    from codedistill.cli import app

    app()


if __name__ == "__main__":  # pragma: no cover
    main()
