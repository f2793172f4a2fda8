from vmim.cli import run

run()
