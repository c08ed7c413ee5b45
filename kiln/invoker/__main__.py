from kiln.invoker.service import main

main()
