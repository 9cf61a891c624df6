from gradwire_server.cli import main

main()
