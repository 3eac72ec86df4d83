"""The `wafer` command line: main.py builds the parser from one module per subcommand (models,
generate, serve, chat, sim), output.py prints for all of them; demo.py is `make demo`.
Commands talk to a server through engine.client; nothing outside engine/cli imports from here."""
