from itemsage.cli.main import app
