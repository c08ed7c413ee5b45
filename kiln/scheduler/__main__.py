from kiln.scheduler.service import main

main()
