from litefspy.cli import main

raise SystemExit(main())
