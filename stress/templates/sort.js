/* Click a column header to sort the table by it (again to reverse). The tables are complete
   without this script; numeric cells carry their raw value in data-v. */
document.querySelectorAll("table.sortable").forEach(function (table) {
  var body = table.tBodies[0];
  table.querySelectorAll("thead th").forEach(function (th) {
    th.tabIndex = 0;
    th.title = "Sort by this column";
    function sort() {
      var i = th.cellIndex;
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[i], y = b.cells[i];
        var vx = x.getAttribute("data-v"), vy = y.getAttribute("data-v");
        if (vx !== null || vy !== null) {
          var nx = vx === null || vx === "" ? NaN : parseFloat(vx);
          var ny = vy === null || vy === "" ? NaN : parseFloat(vy);
          if (isNaN(nx) || isNaN(ny)) { return isNaN(nx) - isNaN(ny); }
          return asc ? nx - ny : ny - nx;
        }
        var c = x.textContent.localeCompare(y.textContent);
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    }
    th.addEventListener("click", sort);
    th.addEventListener("keydown", function (e) { if (e.key === "Enter") { sort(); } });
  });
});
