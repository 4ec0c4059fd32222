{#
    Rows of `model` that repeat on all of `columns`, nulls comparing equal (a member with no
    tenant is one key, like a member with one). dbt's `unique` takes one column; hub packages with
    a combined test cannot be installed here.
#}

{% test unique_rows(model, columns) %}

{%- set key = [] -%}
{%- for column in columns -%}
    {%- do key.append(adapter.quote(column)) -%}
{%- endfor %}
select {{ key | join(', ') }}, count(*) as occurrences
from {{ model }}
group by {{ key | join(', ') }}
having count(*) > 1

{% endtest %}
