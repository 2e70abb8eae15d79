from zoo.serve.cli import main

main()
