"""Command-line entry point (`longcpm ...`, i.e. longcpm.cli.main:main). Nothing is imported here, so
`python -m longcpm.cli.main` runs the module once, cleanly."""
