"""Analysis in DuckDB over the stored Parquet tables and the catalog."""
