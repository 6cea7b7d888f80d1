from sectional_moe.studies.cli import main

raise SystemExit(main())
