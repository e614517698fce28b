-- Sample shop on the source: a reference table, and three tables distributed by customer.
CREATE TABLE countries (code char(2) PRIMARY KEY, name text NOT NULL);
CREATE TABLE customers (customer_id bigint PRIMARY KEY, country char(2) REFERENCES countries, name text, created_at timestamptz DEFAULT now());
CREATE TABLE orders (customer_id bigint NOT NULL, order_id bigserial, status text NOT NULL DEFAULT 'new', total numeric(12,2), placed_at timestamptz DEFAULT now(), PRIMARY KEY (customer_id, order_id));
CREATE TABLE order_items (customer_id bigint NOT NULL, order_id bigint NOT NULL, item_id bigserial, sku text, qty int, price numeric(10,2), PRIMARY KEY (customer_id, item_id));
CREATE INDEX ON orders (placed_at);

INSERT INTO countries VALUES ('DE', 'Germany'), ('FR', 'France'), ('NL', 'Netherlands'), ('US', 'United States');
INSERT INTO customers (customer_id, country, name)
  SELECT g, (ARRAY['DE','FR','NL','US'])[1 + g % 4], 'customer ' || g FROM generate_series(1, 20000) g;
INSERT INTO orders (customer_id, total)
  SELECT 1 + g % 20000, (g % 500) + 0.99 FROM generate_series(1, 200000) g;
INSERT INTO order_items (customer_id, order_id, sku, qty, price)
  SELECT o.customer_id, o.order_id, 'sku-' || (o.order_id % 97), 1 + o.order_id % 3, 9.99 FROM orders o;
