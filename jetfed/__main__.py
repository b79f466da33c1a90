from jetfed.cli import main

main()
