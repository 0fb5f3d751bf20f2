from influx_spout.cli import main

raise SystemExit(main())
