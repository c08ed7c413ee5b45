from kiln.router.service import main

main()
