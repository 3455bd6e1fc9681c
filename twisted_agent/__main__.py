from twisted_agent.cli import main

raise SystemExit(main())
