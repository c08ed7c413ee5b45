from kiln.billing.service import main

main()
