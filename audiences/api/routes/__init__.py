"""The API's routes, one FastAPI router per resource; `app.create_app` includes each."""
