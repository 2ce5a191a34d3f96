"""What more than one Trackly service needs: settings, ids, money, phones, schema, Redis contract."""
