from dmrecover.cli import main

raise SystemExit(main())
