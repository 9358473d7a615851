"""``python -m distprop`` runs the command line."""

from distprop.cli import main

main()
