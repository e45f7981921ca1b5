from itemsage.cli import app

app(prog_name="itemsage")
