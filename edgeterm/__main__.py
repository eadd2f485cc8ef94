from edgeterm.cli import main

main()
