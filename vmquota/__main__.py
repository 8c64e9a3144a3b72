from vmquota.cli import main

main()
