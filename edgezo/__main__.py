"""`python -m edgezo ...` runs the `edgezo` command line."""

try:
    from edgezo.cli.app import main
except ModuleNotFoundError as err:  # a source checkout on PYTHONPATH: cli/ is only mapped to edgezo.cli when installed
    if err.name != "edgezo.cli":
        raise
    from cli.app import main

main()
