from fedmed.runner import main

main()
