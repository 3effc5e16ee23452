from relayguard.cli import main

main()
