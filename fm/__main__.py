from fm.cli import main

main()
