-- 0017_prices_as_data: where each price came from, and as of when.
--
-- `batchdb prices update [FILE]` (batchdb/price_list.py) writes prices from a price map
-- (LiteLLM's format, or the dated map shipped in the package) and records the map's name
-- and date with every row it writes or confirms; the dashboard's Cost page shows the date.
-- NULL: not recorded (seeded by 0001 or written by hand before this migration, or since
-- with plain SQL).

ALTER TABLE batchdb.prices ADD COLUMN source text, ADD COLUMN as_of date;

COMMENT ON COLUMN batchdb.prices.source IS
    'The price map this row was last written or confirmed from (batchdb prices update); NULL: by hand or seeded.';
COMMENT ON COLUMN batchdb.prices.as_of IS
    'The date of the prices in that map; NULL: unknown.';
