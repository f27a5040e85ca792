from distml.cli import main

main()
