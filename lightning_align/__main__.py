from lightning_align.cli import main

main()
