-- runs after every import: no real customer's address reaches a preview
UPDATE users SET email = concat('user', id, '@example.invalid');
