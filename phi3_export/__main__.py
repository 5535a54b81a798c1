from phi3_export.cli import main

main()
