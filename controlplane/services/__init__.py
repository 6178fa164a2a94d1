"""Services: the business rules over the database. HTTP handlers and the CLI stay thin over these."""
