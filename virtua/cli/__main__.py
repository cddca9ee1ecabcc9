from virtua.cli.main import main

main()
