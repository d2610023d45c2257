from dmrecover.cli.main import main

raise SystemExit(main())
