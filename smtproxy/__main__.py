from smtproxy.cli import main

raise SystemExit(main())
