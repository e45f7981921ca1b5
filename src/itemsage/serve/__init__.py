"""The candidate-generation service: FastAPI (app.py) over `Service` (service.py, products.py), its
request bodies, middlewares, query cache and page. `itemsage serve`."""
