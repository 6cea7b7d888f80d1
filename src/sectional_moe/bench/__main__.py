from sectional_moe.bench.cli import main

main()
