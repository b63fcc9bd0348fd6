from recserve.cli import app

app()
