from ringiflow.cli import main

main()
